// Validates Prometheus Operator objects (JSON on stdin, one array) with the schemas that
// @kubernetes-models/prometheus-operator generates from the operator's own API types.
// Prints one line per invalid object and exits 1 if any; exits 0 when all are valid.
import { readFileSync } from "node:fs";
import * as v1 from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

let failed = false;
for (const object of JSON.parse(readFileSync(0, "utf8"))) {
  const Model = object.apiVersion === "monitoring.coreos.com/v1" ? v1[object.kind] : undefined;
  try {
    if (Model === undefined) throw new Error(`no schema for ${object.apiVersion} ${object.kind}`);
    new Model(object).validate();
  } catch (error) {
    failed = true;
    console.log(`${object.kind} ${object.metadata?.name}: ${error.message}`);
  }
}
process.exitCode = failed ? 1 : 0;
