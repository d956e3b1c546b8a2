// Compiles the unit tests (test/unit/*.test.ts, with the sources they import)
// into .test-build/*.test.mjs for `node --test`. Dependencies stay external.
import { readdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const outdir = join(root, ".test-build");
const entryPoints = readdirSync(join(root, "test/unit"))
  .filter((f) => f.endsWith(".test.ts"))
  .map((f) => join(root, "test/unit", f));
if (entryPoints.length === 0) throw new Error("no unit tests found in test/unit");

rmSync(outdir, { recursive: true, force: true });
await build({
  entryPoints,
  outdir,
  outExtension: { ".js": ".mjs" },
  bundle: true,
  platform: "node",
  target: "node20",
  format: "esm",
  packages: "external",
  sourcemap: "inline",
  logLevel: "warning",
});
