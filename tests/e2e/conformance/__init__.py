"""Conformance: every framework family passes the same tests through the gateway.

One mesh (conftest.py, shared by the whole package) serves an add/sub model and an identity model
of each family from one repository; each test runs once per family. The families are in
families.py; test_serving.py checks each family's add/sub model, test_datatypes.py the datatypes
each family carries.
"""
