"""What every stage builds from the run's `RunSpec`: the task's data, read once per run (`data`); the
model with its adapter and the run's masks (`build`: the working set, `Setup`); the loaders and the
validation a training or a search runs on (`loaders`); and the trained adapter and head a stage
writes and a later stage reads back (`trained`). Nothing here reads the config."""
