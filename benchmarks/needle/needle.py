"""Needle in a haystack (or passkey retrieval): does the model find one sentence hidden at some depth of a long text?

    python3 benchmarks/needle/needle.py --lengths 16k,32k --depths 5 --methods ltri,full --out DIR \
        [--task needle|passkey] [--haystack DIR_OF_TXT] [--device cuda] [--dtype bfloat16] [--max-new-tokens 32] \
        [--budget N] [--window N]

The same as `ltri needle`; the harness lives in the package ltri.needle (README.md next to this file).
"""

from ltri.needle.command import main

if __name__ == "__main__":
    main()
