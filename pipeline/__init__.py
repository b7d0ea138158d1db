"""What the scripts do (train, test, eval, serve, export): the scripts only read settings and call these modules."""
