"""Model updates over MQTT, device side.

machine.py    the states, the transition table, `run_job` (journal before each step)
steps.py      what each state does, over the model store and the registry
journal.py    one JSON file per job under <store>/.updates/ (atomic writes)
transfer.py   pulling the payload a window of blocks at a time, checked and fsynced
encoding.py   zstd blocks and bsdiff4 deltas, decoded with bounds
service.py    offers, blocks and commands from MQTT to jobs; state and error reports back
"""
