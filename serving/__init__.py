"""The model server: a registered model answering MLflow's scoring requests, with limits,
deadlines, batching across requests, readiness, metadata and metrics (`settings`, `engine`,
`app`)."""
