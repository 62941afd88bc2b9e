// Runs the TypeScript examples of README.md verbatim. Each ```ts block is
// preceded by `<!-- readme-test: always -->` (any daemon) or
// `<!-- readme-test: e2e -->` (needs microVMs). A block is type-checked
// against the package's declarations, transpiled, written inside the package
// (so `@forkd/client` resolves to this package by self-reference) and run as
// its own Node process with FORKD_URL and FORKD_TOKEN set, as a reader would.

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import ts from "typescript";

import { Daemon, E2E, PKG_DIR } from "./daemon.js";

const README = join(PKG_DIR, "README.md");
const WORK = join(PKG_DIR, "build", "readme");

function blocks(): { kind: string; code: string }[] {
  const re = /<!-- readme-test: (\w+) -->\n```ts\n([\s\S]*?)\n```/g;
  return [...readFileSync(README, "utf8").matchAll(re)].map((m) => ({ kind: m[1]!, code: m[2]! }));
}

function typecheck(file: string): string[] {
  const options: ts.CompilerOptions = {
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    lib: ["lib.es2022.d.ts", "lib.esnext.disposable.d.ts"],
    types: ["node"],
    strict: true,
    noEmit: true,
    skipLibCheck: true,
  };
  const program = ts.createProgram([file], options);
  return ts
    .getPreEmitDiagnostics(program)
    .map((d) => ts.flattenDiagnosticMessageText(d.messageText, "\n") + (d.file ? ` (${d.file.fileName})` : ""));
}

function runBlock(index: number, code: string, url: string, token: string): string {
  mkdirSync(WORK, { recursive: true });
  // No package.json of its own here: the nearest one is the package's, so
  // "@forkd/client" resolves by self-reference through its "exports" (to
  // dist/*.d.ts for the type-check, dist/*.js at run time); .mts/.mjs make
  // the files ES modules.
  const tsFile = join(WORK, `block${index}.mts`);
  writeFileSync(tsFile, code);
  assert.deepEqual(typecheck(tsFile), [], "README example does not type-check");
  const js = ts.transpileModule(code, {
    compilerOptions: { target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.ESNext },
  }).outputText;
  const jsFile = join(WORK, `block${index}.mjs`);
  writeFileSync(jsFile, js);
  const env: NodeJS.ProcessEnv = { ...process.env, FORKD_URL: url, FORKD_TOKEN: token };
  delete env.FORKD_TOKEN_FILE;
  const r = spawnSync(process.execPath, [jsFile], { env, encoding: "utf8", timeout: 600_000 });
  assert.equal(r.status, 0, `example ${index} failed:\n${r.stderr}`);
  return r.stdout;
}

describe("README", () => {
  it("has marked examples", () => {
    const kinds = blocks().map((b) => b.kind);
    assert.ok(kinds.includes("always") && kinds.includes("e2e"), kinds.join());
    assert.ok(kinds.every((k) => k === "always" || k === "e2e"), kinds.join());
    // Every ts block is marked, so none escapes testing.
    assert.equal(readFileSync(README, "utf8").split("```ts\n").length - 1, kinds.length);
  });

  describe("examples without VMs", () => {
    let d: Daemon;
    before(async () => {
      d = await Daemon.start();
    });
    after(async () => {
      await d?.stop();
      rmSync(WORK, { recursive: true, force: true });
    });
    blocks().forEach((b, i) => {
      if (b.kind !== "always") return;
      it(`example ${i} runs`, () => {
        const out = runBlock(i, b.code, d.url, d.token);
        assert.match(out, /NOT_FOUND/);
        assert.match(out, /wrong token/);
      });
    });
  });

  describe("examples with VMs", { skip: E2E ? false : "needs microVMs: set FORKD_E2E=1" }, () => {
    let d: Daemon;
    before(async () => {
      d = await Daemon.start();
      // The example creates "py" itself when missing; with a non-python test
      // image, make it first so the example forks from that image.
      if (process.env.FORKD_E2E_IMAGE) {
        await d.client().snapshots.create("py", { image: process.env.FORKD_E2E_IMAGE });
      }
    });
    after(async () => {
      await d?.stop();
    });
    blocks().forEach((b, i) => {
      if (b.kind !== "e2e") return;
      it(`example ${i} runs`, async () => {
        const out = runBlock(i, b.code, d.url, d.token);
        assert.ok(out.trim().length > 0, "the example printed nothing");
        assert.deepEqual(await d.client().sandboxes.list(), [], "the example left sandboxes running");
      });
    });
  });
});
