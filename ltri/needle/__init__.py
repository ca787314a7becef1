"""Needle in a haystack, and passkey retrieval: does the model find one sentence hidden at some depth
of a long text? (benchmarks/needle/README.md)

For every (method, length, depth) cell: a haystack (the sorted .txt files of a directory, concatenated
and repeated, or generated filler) trimmed by tokens so that haystack + hidden sentence is the context
length, the sentence inserted at the sentence boundary nearest to depth % of the haystack's tokens,
fed to a new Session configured for the method (``ltri.methods``), then asked the question; the answer
scored by the terms it holds, and for the methods on the ltri policy the needle's recall per layer.

    settings.py    NeedleRun and option parsing      tasks.py    the needle and the passkey probes
    haystack.py    haystack, insertion, contexts     scoring.py  answer terms found
    recall.py      the needle's resident tokens      cell.py     one cell: read, answer, record
    grid.py        resumable cells, one JSON each    run_config.py  config.json, resume checks
    report.py      summary.csv, table, heatmaps      command.py  main (the script) and run_benchmark

Nothing is imported here, so that `ltri needle --help` stays light: import ``ltri.needle.command``.
"""
