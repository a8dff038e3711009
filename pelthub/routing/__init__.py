"""Who decides the weights: Poly / MHR routing (poly.py), Arrow (arrow.py), UniPELT gates and ATTEMPT attention."""
from .arrow import Arrow, ArrowModule, arrow_module
from .poly import Poly, PolyModule, add_task, poly_module
from .poly_export import export_task_lora, plot_routing, task_lora_state

__all__ = ["Arrow", "ArrowModule", "Poly", "PolyModule", "add_task", "arrow_module",
           "export_task_lora", "plot_routing", "poly_module", "task_lora_state"]
