"""The PRISM recurrence (PRISM.md sections 1 and 4), one module per backend."""
