"""The rules of training data: loss specifications (`loss_specs`) and the checks of one datum with their REASON vocabulary (`datum_rules`)."""
