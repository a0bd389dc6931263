"""The linear L2-SVM probe, split by role: design.py (the objective, the model, primal and Gram designs with
their preconditioners), solver.py (truncated Newton, the fit API), protocol.py (config, draws, checks,
preprocessing, scoring), search.py (choosing C; the full and 400-per-class settings) and stage.py (the
stage: feature file -> results JSON, with progress, resume and reuse by key). The names below are its API."""
from . import design, protocol, search, solver, stage
from .design import LinearModel, accuracy, prepare
from .protocol import Config, pack_correct, unpack_correct
from .solver import fit, fit_c_path, fit_liblinear, fit_path
from .stage import default_out, finished_results, planned_out, results_key, run, up_to_date

__all__ = ["design", "protocol", "search", "solver", "stage", "LinearModel", "accuracy", "prepare", "Config",
           "pack_correct", "unpack_correct", "fit", "fit_c_path", "fit_liblinear", "fit_path", "default_out",
           "finished_results", "planned_out", "results_key", "run", "up_to_date"]
