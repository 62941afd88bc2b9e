"""Tests for runtime.py, driven over its real pipe protocol.

Run with:  python3 -m unittest discover -s guest/runtime -v
(Needs only the standard library; numpy is used when installed.)
"""

import json
import os
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
RUNTIME = os.path.join(HERE, "runtime.py")


class Runtime:
    def __init__(self, warm=""):
        req_r, self.req_w = os.pipe()
        self.resp_r, resp_w = os.pipe()
        env = dict(os.environ, FORKD_WARM=warm)
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-B", RUNTIME, str(req_r), str(resp_w)],
            pass_fds=(req_r, resp_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        os.close(req_r)
        os.close(resp_w)
        self.reader = os.fdopen(self.resp_r, "rb")
        self.hello = json.loads(self.reader.readline())

    def call(self, **req):
        os.write(self.req_w, (json.dumps(req) + "\n").encode())
        line = self.reader.readline()
        if not line:
            raise EOFError("runtime exited")
        return json.loads(line)

    def eval(self, code, timeout=0):
        return self.call(op="eval", id=1, code=code, timeout=timeout)

    def close(self):
        os.close(self.req_w)
        self.proc.wait(timeout=10)
        self.reader.close()


class RuntimeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.rt = Runtime(warm="json,os.path,no_such_module_xyz")

    @classmethod
    def tearDownClass(cls):
        cls.rt.close()

    def test_ready_line_reports_warm_errors(self):
        self.assertTrue(self.rt.hello["ready"])
        self.assertIn("no_such_module_xyz", self.rt.hello["warm_error"])

    def test_warm_modules_are_bound(self):
        r = self.rt.eval("json.dumps([1])")
        self.assertEqual(r["result"], "'[1]'")
        self.assertEqual(self.rt.eval("os.path.sep")["result"], "'/'")

    def test_namespace_persists(self):
        self.assertEqual(self.rt.eval("x = 41")["result"], "")
        r = self.rt.eval("x")
        self.assertEqual((r["result"], r["exit_code"], r["error"]), ("41", 0, ""))
        self.assertEqual(self.rt.eval("x += 1\nx * 2")["result"], "84")
        self.assertEqual(self.rt.eval("_")["result"], "84")

    def test_none_result_is_empty(self):
        r = self.rt.eval("print('hi')")
        self.assertEqual((r["result"], r["stdout"]), ("", "hi\n"))

    def test_streams_are_captured(self):
        r = self.rt.eval("import sys, os\nprint('a')\nprint('b', file=sys.stderr)\nos.system('echo c; echo d >&2')")
        self.assertEqual(r["stdout"], "a\nc\n")
        self.assertEqual(r["stderr"], "b\nd\n")
        self.assertEqual(r["result"], "0")

    def test_exception_gives_traceback(self):
        r = self.rt.eval("def f():\n    raise ValueError('boom')\nf()")
        self.assertEqual(r["exit_code"], 1)
        self.assertIn("ValueError: boom", r["error"])
        self.assertIn('File "<eval>"', r["error"])
        self.assertNotIn("runtime.py", r["error"])

    def test_syntax_error(self):
        r = self.rt.eval("def (:")
        self.assertEqual(r["exit_code"], 1)
        self.assertIn("SyntaxError", r["error"])

    def test_system_exit_does_not_kill_the_runtime(self):
        r = self.rt.eval("import sys\nsys.exit(3)")
        self.assertEqual(r["exit_code"], 1)
        self.assertIn("SystemExit", r["error"])
        self.assertEqual(self.rt.eval("1 + 1")["result"], "2")

    def test_timeout_interrupts_busy_loop_and_sleep(self):
        r = self.rt.eval("while True:\n    pass", timeout=0.3)
        self.assertEqual(r["exit_code"], 124)
        r = self.rt.eval("try:\n    import time; time.sleep(5)\nexcept Exception:\n    pass", timeout=0.3)
        self.assertEqual(r["exit_code"], 124)
        self.assertEqual(self.rt.eval("'alive'")["result"], "'alive'")

    def test_reseed_is_deterministic_per_seed(self):
        seed = "00" * 31 + "01"
        self.assertTrue(self.rt.call(op="reseed", seed=seed)["ok"])
        a = self.rt.eval("import random\nrandom.random()")["result"]
        self.rt.call(op="reseed", seed=seed)
        b = self.rt.eval("random.random()")["result"]
        self.rt.call(op="reseed", seed="ff" * 32)
        c = self.rt.eval("random.random()")["result"]
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)

    def test_unknown_op_and_bad_line(self):
        self.assertIn("unknown op", self.rt.call(op="nope")["error"])
        os.write(self.rt.req_w, b"not json\n")
        self.assertEqual(json.loads(self.rt.reader.readline())["exit_code"], 1)

    def test_contexts_are_separate_namespaces_and_can_be_dropped(self):
        self.rt.call(op="eval", id=1, code="shared = 1", context="a")
        self.assertEqual(self.rt.call(op="eval", id=2, code="shared", context="a")["result"], "1")
        other = self.rt.call(op="eval", id=3, code="shared", context="b")
        self.assertEqual(other["error_name"], "NameError")
        # New contexts start with the warm-up imports.
        self.assertEqual(self.rt.call(op="eval", id=4, code="json.dumps(1)", context="b")["result"], "'1'")
        self.rt.call(op="eval", id=5, code="", context="a", drop_context=True)
        gone = self.rt.call(op="eval", id=6, code="shared", context="a")
        self.assertEqual(gone["exit_code"], 1)

    def test_rich_results_and_structured_errors(self):
        self.rt.call(op="eval", id=1, code="class H:\n    def _repr_html_(self): return '<b>x</b>'")
        r = self.rt.call(op="eval", id=2, code="H()", rich=True)
        self.assertEqual(len(r["results"]), 1)
        self.assertTrue(r["results"][0]["main"])
        self.assertEqual(r["results"][0]["data"]["html"], "<b>x</b>")
        e = self.rt.call(op="eval", id=3, code="raise KeyError('k')", rich=True)
        self.assertEqual((e["error_name"], e["error_value"]), ("KeyError", "'k'"))
        self.assertIn("Traceback", e["error"])

    def test_env_and_cwd_hold_for_one_evaluation(self):
        r = self.rt.call(op="eval", id=1, code="import os\n(os.environ['FORKD_T'], os.getcwd())",
                         env={"FORKD_T": "v"}, cwd="/")
        self.assertEqual(r["result"], "('v', '/')")
        after = self.rt.eval("os.environ.get('FORKD_T')")
        self.assertEqual(after["result"], "")

    def test_streamed_output_comes_before_the_reply(self):
        req = {"op": "eval", "id": 9, "code": "import sys\nprint('a')\nprint('b', file=sys.stderr)\n1", "stream": True}
        os.write(self.rt.req_w, (json.dumps(req) + "\n").encode())
        lines = []
        while True:
            v = json.loads(self.rt.reader.readline())
            lines.append(v)
            if "out" not in v:
                break
        outs = [(v["out"], v["text"]) for v in lines[:-1]]
        self.assertEqual("".join(t for s, t in outs if s == "stdout"), "a\n")
        self.assertEqual("".join(t for s, t in outs if s == "stderr"), "b\n")
        self.assertTrue(all(v["id"] == 9 for v in lines))
        self.assertEqual((lines[-1]["stdout"], lines[-1]["result"]), ("", "1"))

    def test_large_output_is_clipped(self):
        r = self.rt.eval("print('x' * (3 << 20))")
        self.assertLess(len(r["stdout"]), (1 << 20) + 100)
        self.assertIn("characters cut", r["stdout"])


if __name__ == "__main__":
    unittest.main()
