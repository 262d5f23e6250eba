// Validates glTF / GLB files with the Khronos glTF validator (npm `gltf-validator`).
// Usage: node tools/gltf-validator/validate.mjs FILE...
// Prints each report as JSON; exits 1 when any file has errors, 2 on bad usage.
import { readFile } from "node:fs/promises";
import validator from "gltf-validator";

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node validate.mjs FILE...");
  process.exit(2);
}
let failed = false;
for (const file of files) {
  const bytes = new Uint8Array(await readFile(file));
  const report = await validator.validateBytes(bytes, { uri: file, maxIssues: 100 });
  console.log(JSON.stringify(report, null, 1));
  if (report.issues.numErrors > 0) {
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
