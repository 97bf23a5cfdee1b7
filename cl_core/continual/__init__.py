"""The research runner: a continual-tuning run over a task sequence.

    config      RunConfig, the methods and recipes (lcia, cl-next), validation
    tasks       the task sequence: bundled benchmark or the user's task files
    training    Trainer glue, models, stage 1 of the tiny model
    state       the run folder's records (state.json, one TaskRecord per finished task)
    run         the run: chains of tasks per (method, seed), resume, results.json
    evaluation  scoring per task type (and VQA accuracy), batched generation
    alpha       where DEMA's α landed (per-task counts for the report)
    report      report.md and the plots
    synthetic, tiny_model, templates   the bundled benchmark, its tiny Llama, CoIN's templates
"""
