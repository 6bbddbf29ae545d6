"""`python -m student_trainer` is `opd-train`; torchrun starts it as `torchrun ... -m student_trainer ...`."""

from student_trainer.cli import main

main()
