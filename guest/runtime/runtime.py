"""forkd warm runtime.

Started once per guest by forkd-agent (``python3 -u -B runtime.py REQ_FD RESP_FD``).
It imports the modules named in FORKD_WARM, reports ready, and then evaluates
code on request in one persistent namespace, so a snapshot taken after warm-up
hands every child an interpreter with those imports already done.

Protocol: one JSON object per line. Requests arrive on REQ_FD, replies leave on
RESP_FD; the process's own stdout/stderr are never used for it, so anything the
evaluated code prints cannot corrupt a reply.

  -> {"op": "eval", "id": N, "code": "...", "timeout": seconds,    (0 = none)
      "context": "", "rich": false, "env": {}, "cwd": "", "drop_context": false, "stream": false}
  <- (with "stream") {"id": N, "out": "stdout"|"stderr", "text": "..."} as the code prints
  <- {"id": N, "result": repr-or-"", "error": traceback-or-"", "exit_code": 0|1|124,
      "stdout": "...", "stderr": "...", "error_name": "", "error_value": "",
      "results": [{"data": {"text": ..., "html": ..., "png": base64}, "main": bool}]}

A context is a namespace of its own, made on first use; "" is the one the
warm-up imported into (new contexts start with the same imports). With
"rich", the last value's representations and every open matplotlib figure
(as PNG, then closed) come back as results.
  -> {"op": "reseed", "seed": "<hex>"}      <- {"ok": true}
  -> {"op": "ping"}                         <- {"ok": true}

The first line written is {"ready": true, "warm_ms": ..., "warm_error": ...}.
"""

import ast
import base64
import builtins
import io
import json
import os
import signal
import sys
import time
import traceback

# Common short names bound next to the module itself, as users expect them.
ALIASES = {"numpy": "np", "pandas": "pd", "matplotlib.pyplot": "plt"}
# Each captured text is cut at this many characters so one reply stays far
# below the agent channel's frame limit.
MAX_TEXT = 1 << 20
THIS_FILE = os.path.abspath(__file__)
MAX_CONTEXTS = 64


class EvalTimeout(BaseException):
    """Raised inside evaluated code when its time is up (not an Exception,
    so a bare ``except Exception`` in user code cannot swallow it)."""


_active = False


def _on_alarm(signum, frame):
    if _active:
        raise EvalTimeout()


def _on_interrupt(signum, frame):
    # SIGINT is how the agent cancels an eval; between evals it is ignored.
    if _active:
        raise KeyboardInterrupt()


def clip(text):
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT] + "\n[... %d characters cut]\n" % (len(text) - MAX_TEXT)
    # Lone surrogates cannot travel as UTF-8 JSON.
    return text.encode("utf-8", "replace").decode("utf-8")


def warm(namespace, modules):
    """Imports each module into the namespace; returns error text or ""."""
    errors = []
    for name in modules:
        name = name.strip()
        if not name:
            continue
        try:
            exec("import " + name, namespace)
            alias = ALIASES.get(name)
            if alias:
                exec("import %s as %s" % (name, alias), namespace)
        except BaseException:
            errors.append(traceback.format_exc())
    return "".join(errors)


class FdCapture:
    """Catches output written straight to file descriptors 1 and 2 (child
    processes, C extensions) while code runs, in anonymous memory files."""

    def __enter__(self):
        self.saved = []
        self.files = []
        try:
            for fd in (1, 2):
                mem = os.memfd_create("forkd-capture-%d" % fd)
                self.saved.append(os.dup(fd))
                self.files.append(mem)
                os.dup2(mem, fd)
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        self.texts = []
        for fd, (saved, mem) in enumerate(zip(self.saved, self.files), start=1):
            os.dup2(saved, fd)
            os.close(saved)
            os.lseek(mem, 0, os.SEEK_SET)
            chunks = []
            while True:
                b = os.read(mem, 1 << 16)
                if not b:
                    break
                chunks.append(b)
            os.close(mem)
            self.texts.append(b"".join(chunks).decode("utf-8", "replace"))
        while len(self.texts) < 2:
            self.texts.append("")
        return False


def format_error(exc):
    """Traceback text without the runtime's own frames."""
    if isinstance(exc, SyntaxError):
        return "".join(traceback.format_exception_only(type(exc), exc))
    tb = exc.__traceback__
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) == THIS_FILE:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def split_code(code):
    """Compiles code as (statements, trailing expression or None), the way an
    interactive prompt shows the value of a last expression."""
    tree = ast.parse(code, "<eval>", "exec")
    tail = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        tail = ast.Expression(tree.body.pop().value)
    body = compile(tree, "<eval>", "exec")
    return body, (compile(tail, "<eval>", "eval") if tail is not None else None)


# Rich results past this many characters in all are left out (one reply
# must stay below the agent channel's frame limit).
MAX_RICH = 3 << 20
# The representations a value may offer, by result kind.
REPRS = (("html", "_repr_html_"), ("markdown", "_repr_markdown_"), ("svg", "_repr_svg_"),
         ("latex", "_repr_latex_"), ("json", "_repr_json_"))


def rich_value(value):
    """The last value's representations, each kind only when it offers one."""
    data = {"text": repr(value)}
    for kind, method in REPRS:
        f = getattr(value, method, None)
        if callable(f):
            try:
                rep = f()
            except Exception:
                continue
            if rep is not None:
                data[kind] = rep if isinstance(rep, str) else json.dumps(rep)
    png = getattr(value, "_repr_png_", None)
    if callable(png):
        try:
            raw = png()
            if isinstance(raw, bytes):
                data["png"] = base64.b64encode(raw).decode()
        except Exception:
            pass
    return data


def figures():
    """Every open matplotlib figure as a PNG result; the figures are closed."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return []
    out = []
    for num in plt.get_fignums():
        buf = io.BytesIO()
        try:
            plt.figure(num).savefig(buf, format="png")
            out.append({"data": {"text": "<Figure %d>" % num, "png": base64.b64encode(buf.getvalue()).decode()},
                        "main": False})
        except Exception:
            pass
    plt.close("all")
    return out


def within_budget(results):
    kept, used = [], 0
    for r in results:
        size = sum(len(v) for v in r["data"].values())
        if used + size > MAX_RICH:
            kept.append({"data": {"text": "[result left out: more than %d characters of results]" % MAX_RICH},
                         "main": r["main"]})
            continue
        used += size
        kept.append(r)
    return kept


class Streamed(io.TextIOBase):
    """A stdout or stderr that sends what is written a line at a time (or
    64 KiB, or on flush), as {"id", "out", "text"} lines before the reply
    (at most MAX_TEXT characters in all; the rest is dropped with a note)."""

    CHUNK = 64 * 1024

    def __init__(self, fd, req_id, name):
        self.fd, self.req_id, self.name, self.sent, self.pending = fd, req_id, name, 0, ""

    def writable(self):
        return True

    def write(self, text):
        if not isinstance(text, str):
            text = str(text)
        self.pending += text
        cut = self.pending.rfind("\n") + 1
        if cut == 0 and len(self.pending) >= self.CHUNK:
            cut = len(self.pending)
        if cut:
            ready, self.pending = self.pending[:cut], self.pending[cut:]
            self._send(ready)
        return len(text)

    def flush(self):
        if self.pending:
            ready, self.pending = self.pending, ""
            self._send(ready)

    def _send(self, text):
        if self.sent > MAX_TEXT:
            return
        part = text[: MAX_TEXT - self.sent + 1]
        self.sent += len(part)
        if self.sent > MAX_TEXT:
            part = part[:-1] + "\n[... output cut at %d characters]\n" % MAX_TEXT
        # A timeout or a cancel must not land in the middle of a line.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGINT})
        try:
            send(self.fd, {"id": self.req_id, "out": self.name, "text": clip(part)})
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


class Scoped:
    """Environment variables and a working directory for one evaluation."""

    def __init__(self, env, cwd):
        self.env = env or {}
        self.cwd = cwd

    def __enter__(self):
        self.saved_env = {k: os.environ.get(k) for k in self.env}
        os.environ.update({str(k): str(v) for k, v in self.env.items()})
        self.saved_cwd = None
        if self.cwd:
            self.saved_cwd = os.getcwd()
            os.chdir(self.cwd)
        return self

    def __exit__(self, *exc):
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if self.saved_cwd is not None:
            try:
                os.chdir(self.saved_cwd)
            except OSError:
                pass
        return False


def evaluate(namespace, code, timeout, rich=False, env=None, cwd="", stream=None):
    global _active
    reply = {"result": "", "error": "", "exit_code": 0, "stdout": "", "stderr": "",
             "error_name": "", "error_value": "", "results": []}
    try:
        body, tail = split_code(code)
    except (SyntaxError, ValueError, OverflowError, RecursionError) as e:
        reply.update(error=format_error(e), exit_code=1, error_name=type(e).__name__, error_value=str(e))
        return reply
    try:
        scope = Scoped(env, cwd).__enter__()
    except OSError as e:
        reply.update(error=format_error(e), exit_code=1, error_name=type(e).__name__, error_value=str(e))
        return reply
    # `stream` is (fd, request id): printed text goes out as it is written.
    if stream:
        out, err = Streamed(stream[0], stream[1], "stdout"), Streamed(stream[0], stream[1], "stderr")
    else:
        out, err = io.StringIO(), io.StringIO()
    saved_streams = sys.stdout, sys.stderr
    capture = FdCapture()
    try:
        with capture:
            sys.stdout, sys.stderr = out, err
            try:
                _active = True
                if timeout and timeout > 0:
                    signal.setitimer(signal.ITIMER_REAL, timeout)
                exec(body, namespace)
                if tail is not None:
                    value = eval(tail, namespace)
                    if value is not None:
                        namespace["_"] = value
                        reply["result"] = repr(value)
                        if rich:
                            reply["results"].append({"data": rich_value(value), "main": True})
            except EvalTimeout:
                reply.update(error="TimeoutError: evaluation exceeded %gs\n" % timeout, exit_code=124,
                             error_name="TimeoutError", error_value="evaluation exceeded %gs" % timeout)
            except BaseException as e:  # SystemExit and KeyboardInterrupt included
                reply.update(error=format_error(e), exit_code=1, error_name=type(e).__name__, error_value=str(e))
            finally:
                _active = False
                signal.setitimer(signal.ITIMER_REAL, 0)
                sys.stdout, sys.stderr = saved_streams
                if stream:
                    out.flush()
                    err.flush()
    except EvalTimeout:
        # The alarm landed in the cleanup itself.
        sys.stdout, sys.stderr = saved_streams
        reply.update(error="TimeoutError: evaluation exceeded %gs\n" % timeout, exit_code=124,
                     error_name="TimeoutError", error_value="evaluation exceeded %gs" % timeout)
    finally:
        scope.__exit__()
    if rich:
        # Figures first, as a notebook shows them, then the value.
        reply["results"] = within_budget(figures() + reply["results"])
    texts = getattr(capture, "texts", ["", ""])
    printed = ("", "") if stream else (out.getvalue(), err.getvalue())
    reply["stdout"] = clip(printed[0] + texts[0])
    reply["stderr"] = clip(printed[1] + texts[1])
    reply["result"] = clip(reply["result"])
    reply["error"] = clip(reply["error"])
    return reply


def reseed(seed_hex):
    """Gives this interpreter's generators fresh state: after a restore every
    child would otherwise continue the template's sequences."""
    seed = bytes.fromhex(seed_hex)
    import random

    random.seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        words = [int.from_bytes(seed[i : i + 4], "little") for i in range(0, len(seed), 4)]
        np.random.seed(words or [0])
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None and hasattr(tempfile, "_name_sequence"):
        tempfile._name_sequence = None


def send(fd, obj):
    data = (json.dumps(obj) + "\n").encode()
    while data:
        n = os.write(fd, data)
        data = data[n:]


def main(argv):
    req_fd = int(argv[1]) if len(argv) > 1 else 0
    resp_fd = int(argv[2]) if len(argv) > 2 else 1
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGINT, _on_interrupt)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    t0 = time.monotonic()
    warm_modules = os.environ.get("FORKD_WARM", "").split(",")
    warm_error = warm(namespace, warm_modules)
    # Named contexts (MAX_CONTEXTS at most), each a namespace of its own.
    contexts = {}
    send(
        resp_fd,
        {
            "ready": True,
            "warm_ms": int((time.monotonic() - t0) * 1000),
            "warm_error": clip(warm_error),
            "python": sys.version.split()[0],
        },
    )
    reader = os.fdopen(req_fd, "rb")
    while True:
        try:
            line = reader.readline()
        except KeyboardInterrupt:
            continue
        if not line:
            return 0
        try:
            req = json.loads(line)
        except ValueError:
            send(resp_fd, {"error": "bad request line", "exit_code": 1})
            continue
        op = req.get("op")
        try:
            if op == "eval":
                name = str(req.get("context") or "")
                if req.get("drop_context"):
                    contexts.pop(name, None)
                    reply = {"result": "", "error": "", "exit_code": 0, "stdout": "", "stderr": ""}
                else:
                    if not name:
                        ns = namespace
                    elif name in contexts:
                        ns = contexts[name]
                    elif len(contexts) >= MAX_CONTEXTS:
                        ns = None
                    else:
                        ns = contexts[name] = {"__name__": "__main__", "__builtins__": builtins}
                        warm(ns, warm_modules)
                    if ns is None:
                        reply = {"result": "", "error": "too many contexts (%d); drop one first\n" % MAX_CONTEXTS,
                                 "exit_code": 1, "stdout": "", "stderr": "", "error_name": "RuntimeError",
                                 "error_value": "too many contexts"}
                    else:
                        env = req.get("env") if isinstance(req.get("env"), dict) else {}
                        stream = (resp_fd, req.get("id")) if req.get("stream") else None
                        reply = evaluate(ns, str(req.get("code", "")), float(req.get("timeout") or 0),
                                         bool(req.get("rich")), env, str(req.get("cwd") or ""), stream)
                reply["id"] = req.get("id")
            elif op == "reseed":
                reseed(str(req.get("seed", "")))
                reply = {"ok": True}
            elif op == "ping":
                reply = {"ok": True}
            else:
                reply = {"error": "unknown op %r" % (op,), "exit_code": 1}
        except BaseException as e:
            reply = {"ok": False, "error": format_error(e), "exit_code": 1}
        send(resp_fd, reply)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
