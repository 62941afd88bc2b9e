#!/usr/bin/env python3
"""End-to-end check of the guest artifacts, by hand, with nothing but QEMU.

Boots a template parent from scripts/build-guest.sh's output, waits until the
warm runtime is ready, defines a variable, saves the device state, kills the
parent and restores several children from the same memory file. Each child is
re-identified (Reinit) and must show the parent's state, its own entropy, the
host's clock and its own private writes.

  scripts/smoke-guest.py [--guest-dir DIR] [--image python|minimal] [--children N] [--keep]

Standard library only; the few protobuf messages it needs are encoded by hand.
Every QEMU it starts is killed on exit, whatever happens.
"""

import argparse
import json
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

MAGIC = b"FKD1"
INITCALL_BLACKLIST = (
    "jent_mod_init,load_system_certificate_list,bpf_tcp_ca_kfunc_init,"
    "bpf_dummy_struct_ops_init,init_encrypted,crypto_kdf108_init"
)

# ---------------------------------------------------------------- protobuf --


def _varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field, wire):
    return _varint(field << 3 | wire)


def pb_int(field, v):
    return _key(field, 0) + _varint(int(v)) if v else b""


def pb_bytes(field, b):
    if isinstance(b, str):
        b = b.encode()
    return _key(field, 2) + _varint(len(b)) + b if b else b""


def pb_msg(field, payload):
    # Always present: an empty oneof member still selects the variant.
    return _key(field, 2) + _varint(len(payload)) + payload


def pb_parse(buf):
    """Returns {field: [values]}: ints for varints, bytes for length-delimited,
    raw 8/4 bytes for fixed64/fixed32."""
    fields, i = {}, 0
    while i < len(buf):
        k, i = _read_varint(buf, i)
        field, wire = k >> 3, k & 7
        if wire == 0:
            v, i = _read_varint(buf, i)
        elif wire == 2:
            n, i = _read_varint(buf, i)
            v, i = buf[i : i + n], i + n
        elif wire == 1:
            v, i = buf[i : i + 8], i + 8
        elif wire == 5:
            v, i = buf[i : i + 4], i + 4
        else:
            raise ValueError("unsupported wire type %d" % wire)
        fields.setdefault(field, []).append(v)
    return fields


def _read_varint(buf, i):
    shift = n = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def _signed(v):
    return v - (1 << 64) if v >= 1 << 63 else v


# Response body variants: field -> (name, {field: (name, type)}).
RESPONSES = {
    2: ("pong", {1: ("runtime_ready", "bool"), 2: ("runtime", "str"), 3: ("uptime_secs", "double"),
                 4: ("agent_version", "str"), 5: ("sandbox_id", "str")}),
    3: ("reinit_done", {1: ("clock_step_nanos", "int"), 2: ("runtime_reseeded", "bool")}),
    4: ("exec_output", {1: ("stream", "int"), 2: ("data", "bytes")}),
    5: ("exec_exit", {1: ("exit_code", "int"), 2: ("signal", "int"), 3: ("timed_out", "bool"),
                      4: ("duration_us", "int")}),
    6: ("eval_result", {1: ("result", "str"), 2: ("error", "str"), 3: ("exit_code", "int"),
                        4: ("stdout", "str"), 5: ("stderr", "str")}),
    7: ("file_data", {1: ("data", "bytes"), 2: ("eof", "bool"), 3: ("size", "int")}),
    8: ("ack", {}),
    10: ("file_stat", {1: ("name", "str"), 2: ("path", "str"), 3: ("size", "int"), 4: ("mode", "int"),
                       5: ("is_dir", "bool"), 6: ("is_symlink", "bool"), 7: ("mtime_unix", "int")}),
    11: ("error", {1: ("kind", "int"), 2: ("message", "str")}),
}
DEFAULTS = {"bool": False, "str": "", "int": 0, "double": 0.0, "bytes": b""}
ERROR_KINDS = ["INTERNAL", "NOT_FOUND", "INVALID", "PERMISSION", "TOO_LARGE", "TIMEOUT", "EXISTS"]


def decode_response(payload):
    top = pb_parse(payload)
    rid = top.get(1, [0])[0]
    for field, (name, schema) in RESPONSES.items():
        if field in top:
            raw = pb_parse(top[field][-1])
            out = {}
            for f, (fname, ftype) in schema.items():
                if f not in raw:
                    out[fname] = DEFAULTS[ftype]
                    continue
                v = raw[f][-1]
                if ftype == "bool":
                    out[fname] = bool(v)
                elif ftype == "int":
                    out[fname] = _signed(v)
                elif ftype == "double":
                    out[fname] = struct.unpack("<d", v)[0]
                elif ftype == "str":
                    out[fname] = v.decode("utf-8", "replace")
                else:
                    out[fname] = bytes(v)
            if name == "error":
                out["kind_name"] = ERROR_KINDS[out["kind"]] if out["kind"] < len(ERROR_KINDS) else str(out["kind"])
            return rid, name, out
    return rid, "empty", {}


def req_ping():
    return pb_msg(2, b"")


def req_reinit(sandbox_id, hostname, entropy, unix_nanos):
    return pb_msg(3, pb_bytes(1, sandbox_id) + pb_bytes(2, hostname) + pb_bytes(3, entropy) + pb_int(4, unix_nanos))


def req_exec(args, env=None, cwd="", timeout_ms=0, stdin=b""):
    body = b"".join(pb_bytes(1, a) for a in args)
    for k, v in (env or {}).items():
        body += pb_msg(2, pb_bytes(1, k) + pb_bytes(2, v))
    body += pb_bytes(3, cwd) + pb_int(4, timeout_ms) + pb_bytes(5, stdin)
    return pb_msg(4, body)


def req_eval(code, timeout_ms=0):
    return pb_msg(5, pb_bytes(1, code) + pb_int(2, timeout_ms))


def req_write_file(path, data, mode=0o644, upload_id="smoke"):
    body = pb_bytes(1, path) + pb_bytes(3, data) + pb_int(4, 1) + pb_int(5, 1) + pb_int(6, mode) + pb_bytes(7, upload_id)
    return pb_msg(7, body)


def req_stat(path):
    return pb_msg(9, pb_bytes(1, path))


# ------------------------------------------------------------------ agent --


class Agent:
    """One connection to a VM's agent socket (QEMU's side of virtio-serial)."""

    def __init__(self, path, deadline):
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        self.buf = b""
        self.next_id = 1

    def close(self):
        self.sock.close()

    def send(self, body):
        rid = self.next_id
        self.next_id += 1
        payload = pb_int(1, rid) + body
        self.sock.sendall(MAGIC + struct.pack("<I", len(payload)) + payload)
        return rid

    def recv(self, deadline):
        while True:
            at = self.buf.find(MAGIC)
            if at > 0:
                self.buf = self.buf[at:]
            if at >= 0 and len(self.buf) >= 8:
                n = struct.unpack("<I", self.buf[4:8])[0]
                if len(self.buf) >= 8 + n:
                    payload, self.buf = self.buf[8 : 8 + n], self.buf[8 + n :]
                    return decode_response(payload)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from the agent")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                raise TimeoutError("no answer from the agent") from None
            if not chunk:
                raise ConnectionError("agent socket closed")
            self.buf += chunk

    def call(self, body, timeout=60):
        rid = self.send(body)
        deadline = time.monotonic() + timeout
        while True:
            got, name, msg = self.recv(deadline)
            if got == rid:
                return name, msg

    def eval(self, code, timeout=60):
        name, msg = self.call(req_eval(code, int(timeout * 1000)), timeout + 10)
        if name != "eval_result":
            raise AssertionError("eval %r: unexpected %s %s" % (code, name, msg))
        return msg

    def exec(self, args, timeout=60, **kw):
        rid = self.send(req_exec(args, timeout_ms=int(timeout * 1000), **kw))
        deadline = time.monotonic() + timeout + 10
        out, err = bytearray(), bytearray()
        while True:
            got, name, msg = self.recv(deadline)
            if got != rid:
                continue
            if name == "exec_output":
                (err if msg["stream"] == 1 else out).extend(msg["data"])
            elif name == "exec_exit":
                return out.decode(), err.decode(), msg
            else:
                raise AssertionError("exec %r: %s %s" % (args, name, msg))


# -------------------------------------------------------------------- qmp --


class Qmp:
    def __init__(self, path, deadline):
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.002)
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg) + "\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("QMP closed during %s" % name)
            r = json.loads(line)
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError("QMP %s: %s" % (name, r["error"]))
            return r.get("return")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------- vm --


def host_tsc_khz():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return 2_000_000


def kernel_cmdline(runtime, warm, tsc_khz):
    parts = [
        "console=ttyS0 quiet",
        "tsc_early_khz=%d" % tsc_khz,
        "tsc=reliable no_timer_check nowatchdog cryptomgr.notests audit=0",
        "initcall_blacklist=" + INITCALL_BLACKLIST,
        "forkd.runtime=" + (runtime or "none"),
    ]
    if warm:
        parts.append("forkd.warm=" + warm)
    return " ".join(parts)


def qemu_command(guest, image_file, mem_file, vm_dir, cmdline, mem_mib, restore):
    mem = "%dM" % mem_mib
    cmd = [
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
        "-machine", "microvm,acpi=on,memory-backend=mem,suppress-vmdesc=on",
        "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", mem,
        "-object", "memory-backend-file,id=mem,size=%s,mem-path=%s,share=%s" % (mem, mem_file, "off" if restore else "on"),
        "-kernel", os.path.join(guest, "vmlinux"),
        "-initrd", os.path.join(guest, "initramfs.img"),
        "-append", cmdline,
        "-drive", "file=%s,if=none,id=root,format=raw,readonly=on" % image_file,
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-serial-device",
        "-chardev", "socket,id=agent,path=%s/agent.sock,server=on,wait=off" % vm_dir,
        "-device", "virtserialport,chardev=agent,name=forkd.agent",
        "-qmp", "unix:%s/qmp.sock,server=on,wait=off" % vm_dir,
        "-serial", "file:%s/console.log" % vm_dir,
    ]
    if restore:
        cmd += ["-global", "migration.send-configuration=off", "-incoming", "defer", "-S"]
    return cmd


class Vms:
    """Every QEMU started here, so all of them die at the end."""

    def __init__(self):
        self.procs = []

    def start(self, cmd, vm_dir):
        os.makedirs(vm_dir, exist_ok=True)
        log = open(os.path.join(vm_dir, "qemu.log"), "wb")
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        log.close()
        self.procs.append(p)
        return p

    def kill(self, p):
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def kill_all(self):
        for p in self.procs:
            self.kill(p)
        return [p.pid for p in self.procs if p.poll() is None]


# ------------------------------------------------------------------ checks --


class Checks:
    def __init__(self):
        self.failed = []
        self.passed = 0

    def check(self, what, ok, detail=""):
        if ok:
            self.passed += 1
            print("  ok    %s" % what)
        else:
            self.failed.append(what)
            print("  FAIL  %s %s" % (what, detail))


def console_tail(vm_dir, n=2000):
    try:
        with open(os.path.join(vm_dir, "console.log"), "rb") as f:
            return f.read()[-n:].decode("utf-8", "replace")
    except OSError:
        return ""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest-dir", default=os.environ.get("FORKD_GUEST_DIR", "/var/lib/forkd/guest"))
    ap.add_argument("--image", default="python", choices=["python", "minimal"])
    ap.add_argument("--children", type=int, default=3)
    ap.add_argument("--mem", type=int, default=256, help="guest RAM in MiB")
    ap.add_argument("--boot-timeout", type=float, default=300)
    ap.add_argument("--workdir", help="where VM files go (default: a new temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--ping-first", action="store_true",
                    help="send a Ping before Reinit to time the bare restore separately")
    args = ap.parse_args()

    guest = os.path.abspath(args.guest_dir)
    manifest = {}
    try:
        with open(os.path.join(guest, "manifest.json")) as f:
            manifest = json.load(f)
    except OSError:
        pass
    meta = manifest.get("images", {}).get(args.image, {})
    runtime = meta.get("runtime", "python" if args.image == "python" else "")
    warm = meta.get("warm", "numpy" if args.image == "python" else "")
    image_file = os.path.join(guest, "images", args.image + ".ext4")
    for f in (os.path.join(guest, "vmlinux"), os.path.join(guest, "initramfs.img"), image_file):
        if not os.path.isfile(f):
            sys.exit("missing %s: run scripts/build-guest.sh first" % f)

    work = args.workdir or tempfile.mkdtemp(prefix="forkd-smoke-")
    os.makedirs(work, exist_ok=True)
    mem_file = os.path.join(work, "mem")
    state_file = os.path.join(work, "state")
    cmdline = kernel_cmdline(runtime, warm, host_tsc_khz())
    vms = Vms()
    checks = Checks()
    timings = {}
    try:
        # ---- parent -----------------------------------------------------
        pdir = os.path.join(work, "parent")
        pcmd = qemu_command(guest, image_file, mem_file, pdir, cmdline, args.mem, restore=False)
        print("parent:\n  " + " ".join(shlex.quote(c) for c in pcmd))
        t0 = time.monotonic()
        parent = vms.start(pcmd, pdir)
        deadline = t0 + args.boot_timeout
        agent = Agent(os.path.join(pdir, "agent.sock"), deadline)
        first = ready = None
        while True:
            if parent.poll() is not None:
                raise RuntimeError("parent QEMU exited (%s); console:\n%s" % (parent.returncode, console_tail(pdir)))
            try:
                name, pong = agent.call(req_ping(), timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeError("parent never answered; console:\n" + console_tail(pdir))
                continue
            if first is None:
                first = time.monotonic() - t0
                print("parent: first agent answer after %.2fs (guest uptime %.2fs)" % (first, pong["uptime_secs"]))
            if pong["runtime_ready"] or not runtime:
                ready = time.monotonic() - t0
                break
            if time.monotonic() > deadline:
                raise RuntimeError("runtime never became ready; console:\n" + console_tail(pdir))
            time.sleep(0.2)
        timings["parent boot -> first answer"] = first
        timings["parent boot -> runtime ready"] = ready
        print("parent: runtime %r ready after %.2fs" % (pong["runtime"], ready))
        if runtime:
            r = agent.eval("x = 41")
            checks.check("parent eval x = 41", r["exit_code"] == 0, r)
            # Imported before the snapshot on purpose: every child inherits
            # the same generator state and only Reinit can tell them apart.
            r = agent.eval("import random")
            checks.check("parent import random", r["exit_code"] == 0, r)
        agent.close()

        qmp = Qmp(os.path.join(pdir, "qmp.sock"), time.monotonic() + 10)
        t = time.monotonic()
        qmp.cmd("stop")
        qmp.cmd("xen-save-devices-state", filename=state_file, live=False)
        timings["snapshot pause (stop + save)"] = time.monotonic() - t
        qmp.close()
        vms.kill(parent)
        print("snapshot: %d bytes of device state, pause %.1f ms" % (
            os.path.getsize(state_file), timings["snapshot pause (stop + save)"] * 1000))

        # ---- children ---------------------------------------------------
        children = []
        for i in range(args.children):
            cdir = os.path.join(work, "child%d" % i)
            ccmd = qemu_command(guest, image_file, mem_file, cdir, cmdline, args.mem, restore=True)
            if i == 0:
                print("child:\n  " + " ".join(shlex.quote(c) for c in ccmd))
            children.append({"dir": cdir, "spawned": time.monotonic(), "proc": vms.start(ccmd, cdir), "id": "sb-%d" % i})

        for c in children:
            qmp = Qmp(os.path.join(c["dir"], "qmp.sock"), time.monotonic() + 10)
            c["agent"] = Agent(os.path.join(c["dir"], "agent.sock"), time.monotonic() + 10)
            t = time.monotonic()
            qmp.cmd("migrate-incoming", uri="file:" + state_file)
            while qmp.cmd("query-status")["status"] == "inmigrate":
                time.sleep(0.001)
            loaded = time.monotonic()
            qmp.cmd("cont")
            if args.ping_first:
                c["agent"].call(req_ping(), timeout=30)
                print("%s: Ping answered %.1f ms after migrate-incoming" % (c["id"], (time.monotonic() - t) * 1000))
            name, done = c["agent"].call(
                req_reinit(c["id"], c["id"], os.urandom(32), time.time_ns()), timeout=30
            )
            answered = time.monotonic()
            qmp.close()
            c["load_ms"] = (loaded - t) * 1000
            c["restore_to_answer_ms"] = (answered - t) * 1000
            c["spawn_to_answer_ms"] = (answered - c["spawned"]) * 1000
            print("%s: device state loaded in %.1f ms, Reinit answered %.1f ms after migrate-incoming"
                  " (%.0f ms after spawn): %s %s" % (c["id"], c["load_ms"], c["restore_to_answer_ms"],
                                                      c["spawn_to_answer_ms"], name, done))
            checks.check("%s reinit" % c["id"], name == "reinit_done", done)
            if runtime:
                checks.check("%s runtime reseeded" % c["id"], done.get("runtime_reseeded") is True, done)

        print("checks:")
        randoms, urandoms = [], []
        for c in children:
            a = c["agent"]
            name, pong = a.call(req_ping())
            checks.check("%s sandbox id" % c["id"], pong.get("sandbox_id") == c["id"], pong)
            if runtime:
                r = a.eval("x")
                checks.check("%s eval x == '41'" % c["id"], r["result"] == "41", r)
                r = a.eval("numpy.zeros(5).sum()")
                checks.check("%s numpy.zeros(5).sum() == '0.0'" % c["id"], r["result"] == "0.0", r)
                r = a.eval("import random\nrandom.random()")
                randoms.append(r["result"])
            out, err, ex = a.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
            checks.check("%s exec out/err/7" % c["id"], (out, err, ex["exit_code"]) == ("out\n", "err\n", 7),
                         (out, err, ex))
            out, err, ex = a.exec(["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"])
            urandoms.append(out.strip())
            out, err, ex = a.exec(["date", "+%s"])
            host = time.time()
            try:
                skew = abs(int(out.strip()) - host)
            except ValueError:
                skew = None
            checks.check("%s clock within 2 s of host" % c["id"], skew is not None and skew <= 2, (out, skew))
        if runtime:
            checks.check("random.random() differs across children", len(set(randoms)) == len(randoms), randoms)
        checks.check("/dev/urandom differs across children", len(set(urandoms)) == len(urandoms) and all(urandoms),
                     urandoms)
        if len(children) >= 2:
            a, b = children[0]["agent"], children[1]["agent"]
            name, msg = a.call(req_write_file("/root/only-in-child0", b"mine\n"))
            checks.check("write a file in %s" % children[0]["id"], name == "ack", msg)
            out, _, _ = a.exec(["cat", "/root/only-in-child0"])
            checks.check("%s reads its file back" % children[0]["id"], out == "mine\n", out)
            name, msg = b.call(req_stat("/root/only-in-child0"))
            checks.check("%s does not see it" % children[1]["id"],
                         name == "error" and msg.get("kind_name") == "NOT_FOUND", (name, msg))

        last = children[-1]
        a = last["agent"]
        if runtime:
            r = a.eval("while True:\n    pass", timeout=1)
            checks.check("%s eval timeout -> 124" % last["id"], r["exit_code"] == 124, r)
            r = a.eval("x")
            checks.check("%s state survives the timeout" % last["id"], r["result"] == "41", r)
        out, err, ex = a.exec(["sleep", "10"], timeout=0.5)
        checks.check("%s exec timeout kills" % last["id"], ex["timed_out"] and ex["signal"] == 9, ex)
        out, err, ex = a.exec(["cat"], stdin=b"fed through stdin\n")
        checks.check("%s exec stdin" % last["id"], out == "fed through stdin\n" and ex["exit_code"] == 0, (out, ex))
        # A host that drops the connection mid-frame: the agent must discard
        # the fragment and answer on the next connection.
        a.sock.sendall(MAGIC + struct.pack("<I", 50) + b"partial")
        time.sleep(0.2)
        a.close()
        a = last["agent"] = Agent(os.path.join(last["dir"], "agent.sock"), time.monotonic() + 10)
        try:
            name, pong = a.call(req_ping(), timeout=10)
            checks.check("%s answers after a reconnect" % last["id"], name == "pong", pong)
        except Exception as e:
            checks.check("%s answers after a reconnect" % last["id"], False, e)

        for c in children:
            c["agent"].close()
        print("timings:")
        for k, v in timings.items():
            print("  %-32s %8.2f s" % (k, v))
        for c in children:
            print("  %-32s %8.1f ms (load %.1f ms, spawn -> answer %.0f ms)" % (
                c["id"] + " restore -> first answer", c["restore_to_answer_ms"], c["load_ms"], c["spawn_to_answer_ms"]))
    except Exception as e:
        print("ERROR: %s" % e, file=sys.stderr)
        checks.failed.append("exception: %s" % e)
    finally:
        left = vms.kill_all()
        if left:
            print("WARNING: QEMU processes still alive: %s" % left, file=sys.stderr)
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            print("work directory kept: %s" % work)
    print("%d passed, %d failed" % (checks.passed, len(checks.failed)))
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
