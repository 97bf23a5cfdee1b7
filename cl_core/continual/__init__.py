"""The research runner: a continual-tuning run over a task sequence (config, tasks,
training, the run, evaluation, report), the bundled synthetic CoIN-like benchmark,
the tiny model it trains and the instruction templates it uses."""
