"""The tasks by name (`data.task`, `lorasync eval --task`): a module of its own, so that a task
module may import another (`calculator` builds on `arith`) without a cycle through the
package's `__init__`."""

from lorasync.tasks import arith, calculator

TASKS = {"arith": arith, "calc": calculator}
