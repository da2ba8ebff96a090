"""`unipeft compare`: every method on the user's task, lr picked on validation, tested once, with references."""
