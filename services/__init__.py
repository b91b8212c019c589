"""The demo's services: the demo writer (`demo.py`) and the billing service (`billing.py`).

They use the library as any company service would; `python -m app demo|billing` starts them.
"""
