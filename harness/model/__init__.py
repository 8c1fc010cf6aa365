"""What the model is: ModelSpec, the formula (R's term algebra on formulae's parse), the design
(X and Z blocks), priors and response families. Reads data, fits nothing.
"""
