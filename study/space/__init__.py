"""The search space: its schema (:mod:`.schema`), the YAML file read one section at a time (:mod:`.parse`)
and the trial plan (:mod:`.plan`)."""
from study.space.parse import load_space, parse_space, resolve_path
from study.space.plan import Plan, PlannedTrial, checked_params, params_key, plan, planned_configs, validate_plan
from study.space.schema import (SPACES_DIR, Param, RandomSuggester, SearchSpace, SpaceError, Suggester,
                                expand, trial_config)

__all__ = ["SPACES_DIR", "Param", "Plan", "PlannedTrial", "RandomSuggester", "SearchSpace", "SpaceError",
           "Suggester", "checked_params", "expand", "load_space", "params_key", "parse_space", "plan", "planned_configs",
           "resolve_path",
           "trial_config", "validate_plan"]
