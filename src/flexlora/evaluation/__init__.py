"""lm-evaluation-harness bridge: ``flexlora eval`` and the end-of-run ``eval.harness_tasks``.

:mod:`.harness` scores an in-memory model (a plain base, a ``PeftModel``, or the simulator's
merged global model) on lm-eval tasks named by lm-eval's own names, offline; :mod:`.targets`
turns an adapter folder or a run folder into a base model and the adapters to score on it;
:mod:`.cli` is the command. lm-eval is the optional extra ``eval`` (``pip install
'flexlora[eval]'``), imported only when something is scored.
"""
