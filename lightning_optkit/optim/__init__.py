"""Kit optimizers: a small base class and the optimizers written on it."""
