"""Run the adversarial sweep: the parametrised tests of tests/test_sweep.py (cases in tests/sweep.py).

    python scripts/adversarial_sweep.py [pytest options, e.g. -x -k resume]

is `python -m pytest -m sweep tests/test_sweep.py` (`-m "sweep and not heavy"` leaves out the four
cases on the embedded SmolLM2-135M).
"""

import sys
from pathlib import Path

import pytest

if __name__ == "__main__":
    args = sys.argv[1:]
    marks = [] if "-m" in args else ["-m", "sweep"]
    sys.exit(pytest.main([*marks, str(Path(__file__).resolve().parent.parent / "tests" / "test_sweep.py"), *args]))
