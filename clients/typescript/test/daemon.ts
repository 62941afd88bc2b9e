// Starts a real forkd-server for the tests: ephemeral loopback port, temp
// data dir, token file. The binary comes from $FORKD_SERVER_BIN, else the
// cargo target dir; a missing binary fails the run rather than skipping it.

import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync, openSync, readFileSync, closeSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { Client, type ClientOptions, type SnapshotInfo } from "../src/index.js";

/** Passes the daemon's token checks (>= 16 bytes, not a placeholder). */
export const TOKEN = "tKq2r9VfX81mWz4LcN7pHs0dJy5uBe3a";
export const E2E = process.env.FORKD_E2E === "1";
export const E2E_TAG = "ts";
// build/test/daemon.js -> clients/typescript
export const PKG_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const REPO = resolve(PKG_DIR, "..", "..");

export function serverBin(): string {
  const bin =
    process.env.FORKD_SERVER_BIN ||
    join(process.env.CARGO_TARGET_DIR || join(REPO, "target"), "debug", "forkd-server");
  if (!existsSync(bin)) {
    throw new Error(`forkd-server not found at ${bin}: run \`cargo build -p forkd-server\` or set FORKD_SERVER_BIN`);
  }
  return bin;
}

export class Daemon {
  readonly tmp: string;
  readonly dataDir: string;
  url = "";
  private proc: ChildProcess | undefined;
  private logFd: number;

  private constructor(readonly token: string) {
    this.tmp = mkdtempSync(join(tmpdir(), "forkd-ts-"));
    this.dataDir = join(this.tmp, "data");
    this.logFd = openSync(join(this.tmp, "stderr.log"), "w");
  }

  static async start(token = TOKEN): Promise<Daemon> {
    const d = new Daemon(token);
    const tokenFile = join(d.tmp, "token");
    writeFileSync(tokenFile, token, { mode: 0o600 });
    const args = ["--bind", "127.0.0.1:0", "--data-dir", d.dataDir, "--token-file", tokenFile, "--log", "warn"];
    if (process.env.FORKD_GUEST_DIR) args.push("--guest-dir", process.env.FORKD_GUEST_DIR);
    const proc = spawn(serverBin(), args, { stdio: ["ignore", "pipe", d.logFd] });
    d.proc = proc;
    d.url = await new Promise<string>((res, rej) => {
      let buf = "";
      const timer = setTimeout(() => rej(new Error(`forkd-server did not start: ${d.stderr()}`)), 180_000);
      proc.stdout!.on("data", (chunk: Buffer) => {
        buf += chunk.toString();
        const m = /forkd-server listening on (\S+)/.exec(buf);
        if (m) {
          clearTimeout(timer);
          res(m[1]!);
        }
      });
      proc.on("exit", (code) => {
        clearTimeout(timer);
        rej(new Error(`forkd-server exited with ${code}: ${d.stderr()}`));
      });
    });
    proc.removeAllListeners("exit");
    return d;
  }

  stderr(): string {
    try {
      return readFileSync(join(this.tmp, "stderr.log"), "utf8").slice(-4000);
    } catch {
      return "";
    }
  }

  client(opts: ClientOptions = {}): Client {
    return new Client({ url: this.url, token: this.token, ...opts });
  }

  async stop(): Promise<void> {
    const proc = this.proc;
    if (proc && proc.exitCode === null) {
      // Sandboxes outlive the daemon by design; a test daemon must not leave VMs behind.
      try {
        await this.client({ timeoutMs: 30_000 }).sandboxes.kill({ all: true });
      } catch {
        // The daemon may already be unusable; stopping it is what matters.
      }
      const exited = new Promise((res) => proc.once("exit", res));
      proc.kill("SIGTERM");
      const timer = setTimeout(() => proc.kill("SIGKILL"), 15_000);
      await exited;
      clearTimeout(timer);
    }
    closeSync(this.logFd);
    rmSync(this.tmp, { recursive: true, force: true });
  }
}

/** Bakes the end-to-end suites' snapshot on `d` (FORKD_E2E_IMAGE, default python). */
export async function bakeE2E(d: Daemon, tag: string = E2E_TAG): Promise<SnapshotInfo> {
  const timeoutMs = Number(process.env.FORKD_E2E_TIMEOUT ?? "900") * 1000;
  return d.client().snapshots.create(tag, { image: process.env.FORKD_E2E_IMAGE ?? "python", timeoutMs });
}
