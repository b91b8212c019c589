"""The demo's services: the demo writer (`demo.py`) and the billing service (`billing.py`).

They use the library as any company service would; `python -m services demo|billing` starts them
(`__main__.py`): the library does not import them.
"""
