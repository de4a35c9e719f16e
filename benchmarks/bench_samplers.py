"""Benchmark the text samplers (reference LLaDA, fast, AR twin); see `python benchmarks/bench_samplers.py --help`.

Same as `mmdlm bench`. Examples:
  python benchmarks/bench_samplers.py --quick                      # < 1 minute on 2 CPU cores
  python benchmarks/bench_samplers.py --gen-lengths 64,256,1024    # small random model on CPU
  python benchmarks/bench_samplers.py --llada-8b-shape --dtype bf16 --device cuda --grid 256x1,256x8,1024x1
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mmdlm.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
