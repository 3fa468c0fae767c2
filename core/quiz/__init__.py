"""The Quiz page's core: a student's marks and answer scored against the lesion mask and the models
(`scoring`), and the class's anonymous answers in SQLite (`store`)."""
