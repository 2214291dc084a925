"""Set up ComfyUI-InstantCharacter in the Python that runs this script.

    python install.py                      # install the requirements (torch only if it is missing)
    python install.py --download-models    # also fetch FLUX.1-dev, SigLIP, DINOv2 and the adapter

It uses ``sys.executable``, so run it with the Python that runs ComfyUI (for the Windows portable build:
``python_embeded\\python.exe custom_nodes\\ComfyUI-InstantCharacter\\install.py``). An installed torch is
never replaced. Safe to run twice. ComfyUI-Manager runs it automatically.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("running:", " ".join(command), flush=True)
    subprocess.check_call(command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--download-models", action="store_true",
                        help="download every model into the ComfyUI models folder (FLUX.1-dev needs HF_TOKEN or "
                             "`hf auth login`, after accepting its licence on huggingface.co)")
    parser.add_argument("--models-dir", type=Path, default=None, help="ComfyUI models folder (default: found)")
    args = parser.parse_args(argv)

    print(f"python: {sys.executable} ({sys.version.split()[0]})")
    if importlib.util.find_spec("torch") is None:
        print("torch: not installed, installing it (for a GPU build, install torch yourself first)")
        pip("torch")
    else:
        import torch

        print(f"torch: {torch.__version__} already installed, left as it is")
    pip("-r", str(HERE / "requirements.txt"))
    print("requirements: installed")

    if args.download_models:
        sys.path.insert(0, str(HERE))
        from instantcharacter.files import hub
        from instantcharacter.files.locations import default_models_dir, locate_all

        models_dir = args.models_dir or default_models_dir()
        for loc in locate_all(models_dir).values():
            if loc.present:
                print(f"{loc.model.repo_id}: already present at {loc.path}")
                continue
            print(f"{loc.model.repo_id}: downloading {loc.model.size} into {loc.path}", flush=True)
            hub.download(loc.model, loc.path.parent if loc.model is hub.ADAPTER else loc.path)
            print(f"{loc.model.repo_id}: done")
    print("done. Restart ComfyUI to load the nodes.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
