"""bench/throughput.py runs each engine version in a worker process started as a script from bench/, whose
folder Python puts first on sys.path: a module there named like a standard-library one would shadow it in
the worker (bench/profile.py once broke `import cProfile`, and with it transformers' tokenizer loading)."""
from __future__ import annotations

import sys
from pathlib import Path

from idlm.bench import throughput


def test_the_worker_folder_shadows_no_standard_module():
    folder = Path(throughput.__file__).parent
    clashes = sorted(p.stem for p in folder.glob("*.py") if p.stem in sys.stdlib_module_names)
    assert clashes == []
