"""Statistics at the bottom of `core/`: metrics of one set of predictions (`metrics`), the ISIC challenges'
scores (`isic`), and intervals, paired tests and calibration (`uncertainty`). Evaluation, the audit and the
figures all build on them; they import nothing of the project but `core.formatting`."""
