"""The research runner: a continual-tuning run over a task sequence.

    config      RunConfig: every run setting, declared once with its section, flag and help
    methods     the table of methods and recipes (lcia, cl-next, moelora): the only place a method is defined
    validation  the settings' checks (errors name the setting, or the flag it came from)
    tasks       the task sequence: bundled benchmark or the user's task files
    training    Trainer glue, models, stage 1 of the tiny model
    adapters    the MoELoRA adapter set the runner trains (cl_core.lora_sets.AdapterSets)
    state       the run folder's records (state.json, one TaskRecord per finished task)
    run         the run: chains of tasks per (method, seed), one TaskOutcome per task, resume, results.json
    evaluation  scoring per task type (and VQA accuracy), batched generation
    alpha       where DEMA's α landed (per-task counts for the report)
    report      report.md and the plots (analysis, plots, markdown)
    launch      torchrun / accelerate / DeepSpeed launches
    multimodal, model_folder, encoders, images   image-text models and the drawn scenes
    synthetic, tiny_model, templates   the bundled benchmark, its tiny Llama, CoIN's templates
"""
