"""Composing the stages for one design: settings, the on-disk fit cache and the runner.
Never imports report code: figures come in through a render hook.
"""
