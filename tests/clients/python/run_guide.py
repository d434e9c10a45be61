"""Runs every `sh` and `python` block of a Markdown page, in the page's order, as a reader would.

The `sh` blocks run in one bash session (`set -euo pipefail`) and the `python` blocks in one
Python namespace, so each block sees what the blocks before it in its language defined, and the
files the others wrote. A block that fails, or any fence of another language than sh, python,
text or json (a command nothing would run), fails the run. Addresses and paths of the page are
replaced by the test platform's (GUIDE_* environment variables); the shell's rest-hook endpoint
`https://clinic-7.example/notifications` is served here, and keeps the last notification it got
in `notification.json` and its signature header in `notification.signature`.

    run_guide.py PAGE WORKDIR
"""

import http.server
import os
import re
import subprocess
import sys
import threading
import time

BLOCK_TIMEOUT_SECS = 120
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```$", re.S | re.M)
RUNNABLE, INERT = ("sh", "python"), ("text", "json")


def blocks(page):
    for match in FENCE.finditer(page):
        indent, language, body = match.groups()
        line = page.count("\n", 0, match.start()) + 1
        if language not in RUNNABLE + INERT:
            sys.exit(f"line {line}: a ```{language} fence; commands are sh or python (run), output text or json")
        if language in RUNNABLE:
            yield line, language, "".join(l[len(indent):] if l.startswith(indent) else l for l in body.splitlines(True))


class ShellEndpoint(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        # The signature first, then the body by rename: a reader never sees a body without it.
        with open("notification.signature", "w") as f:
            f.write(self.headers.get("X-Fhir-Event-Signature", ""))
        with open("notification.json.part", "wb") as f:
            f.write(body)
        os.replace("notification.json.part", "notification.json")
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def main(page_path, workdir):
    page = open(page_path, encoding="utf-8").read()
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    endpoint = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ShellEndpoint)
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    env = os.environ
    replacements = [
        ("http://127.0.0.1:8080", env["GUIDE_ORIGIN"]),
        ("127.0.0.1:9092", env["GUIDE_KAFKA"]),
        ("fhir.partner.", env["GUIDE_TOPIC_PREFIX"] + "fhir.partner."),
        ("https://clinic-7.example/notifications", f"http://127.0.0.1:{endpoint.server_port}/notifications"),
        ("target/debug/", env["GUIDE_BIN"] + "/"),
        ("identity/python", os.path.join(env["GUIDE_REPO"], "identity/python")),
    ]
    shell = subprocess.Popen(
        ["bash", "--noprofile", "--norc"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**env, "PATH": env["GUIDE_BIN"] + os.pathsep + env["PATH"]},
    )
    shell.stdin.write("set -euo pipefail\n")
    namespace = {"__name__": "guide"}
    ran = {"sh": 0, "python": 0}
    for n, (line, language, code) in enumerate(blocks(page)):
        for old, new in replacements:
            code = code.replace(old, new)
        print(f"--- {page_path}:{line} ({language})", flush=True)
        timer = threading.Timer(BLOCK_TIMEOUT_SECS, lambda: (print(f"line {line}: still running after {BLOCK_TIMEOUT_SECS} s", flush=True), os._exit(3)))
        timer.daemon = True  # a failing block ends the run at once
        timer.start()
        started = time.monotonic()
        if language == "python":
            exec(compile(code, f"{page_path}:{line}", "exec"), namespace)
        else:
            script = f"block-{n}.sh"
            with open(script, "w") as f:
                f.write(code)
            done = f"__block_{n}_done__"
            shell.stdin.write(f"source {script} </dev/null; echo {done}\n")
            shell.stdin.flush()
            for out in shell.stdout:
                if out.rstrip("\n").endswith(done):  # after output that did not end its line
                    print(out.rstrip("\n")[: -len(done)], flush=True)
                    break
                print(out, end="", flush=True)
            else:
                sys.exit(f"line {line}: the shell block failed (exit status {shell.wait()})")
        timer.cancel()
        ran[language] += 1
        print(f"    ({time.monotonic() - started:.1f} s)", flush=True)
    shell.stdin.close()
    shell.wait()
    endpoint.shutdown()
    print(f"ran {ran['sh']} sh and {ran['python']} python blocks")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
