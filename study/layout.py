"""Where things lie in a study folder (``<storage>/<study name>/``, the Ray Tune experiment folder): the
names every stage of a study agrees on."""

STUDY_FILE = "study.json"  # the space as run, its overrides and resources (what --resume reads)
RESULTS_FILE = "results.csv"  # one row per trial (study.record.results_csv; read by study.results)
TENSORBOARD_DIR = "tensorboard"  # one run per trial, the HParams experiment summary at its top
OPTUNA_DB = "optuna.db"  # the default Optuna record (SQLite)
