"""What `validate` measures for each kind of task; one module per task."""
