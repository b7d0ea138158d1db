"""The good/defect classifier: anomaly-map features, synthetic defects, and an XGBoost model on top of the anomaly model."""
