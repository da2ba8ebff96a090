"""Complex query answering over knowledge graphs: CQD and CQD^A on a frozen ComplEx link predictor."""
