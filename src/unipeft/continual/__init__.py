"""Continual learning on unipeft: task streams, replay, SGD/ER/DER++/joint baselines, FPF and k-FPF.

```python
from unipeft import continual as cl
stream = cl.split_by_classes(train, test, classes_per_task=2, scenario="class-il")
result = cl.run_continual(model, stream, "er+fpf", cl.CLConfig(buffer_size=50))
result.final_average_accuracy, result.average_forgetting, result.compute
print(result.drift.table())          # modules ranked by forgetting score, FPF's selection marked
```
The benchmarks (`cl.run_benchmark("seq-digits", ["er", "er+fpf"], seeds=[0, 1, 2])`) and the
CLI verb `unipeft continual` build on the same functions (README, section "Continual learning").
"""
from .buffer import BufferBatch, ReservoirBuffer
from .compute import ComputeMeter
from .drift import DriftReport, DriftTracker, module_groups, select_modules
from .errors import ContinualError
from .fpf import FPFConfig, fpf_finetune
from .learner import METHODS, CLConfig, CLResult, parse_method, run_continual
from .metrics import average_accuracy, average_forgetting, backward_transfer, evaluate, forgetting_per_task
from .stream import SCENARIOS, Task, TaskStream, TensorData, split_by_classes
from .suites import BENCHMARKS, DEFAULT_METHODS, get_benchmark, markdown_table, run_benchmark

__all__ = ["BENCHMARKS", "BufferBatch", "CLConfig", "CLResult", "ComputeMeter", "ContinualError", "DEFAULT_METHODS",
           "DriftReport", "DriftTracker", "FPFConfig", "METHODS", "ReservoirBuffer", "SCENARIOS", "Task",
           "TaskStream", "TensorData", "average_accuracy", "average_forgetting", "backward_transfer", "evaluate",
           "forgetting_per_task", "fpf_finetune", "get_benchmark", "markdown_table", "module_groups",
           "parse_method", "run_benchmark", "run_continual", "select_modules", "split_by_classes"]
