// Bundles the inbox demo (demo/src/main.tsx, with React and the package
// sources) into demo/dist/main.js. Usable as a module: `buildDemo()`.
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { build } from "esbuild";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");

/** Builds demo/dist/main.js; resolves when written, rejects on a build error. */
export async function buildDemo() {
  await build({
    entryPoints: [join(root, "demo/src/main.tsx")],
    outfile: join(root, "demo/dist/main.js"),
    bundle: true,
    format: "esm",
    platform: "browser",
    target: ["es2022"],
    jsx: "automatic",
    minify: true,
    sourcemap: true,
    define: { "process.env.NODE_ENV": '"production"' },
    logLevel: "warning",
  });
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  await buildDemo();
  console.log("built demo/dist/main.js");
}
