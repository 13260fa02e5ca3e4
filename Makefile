# medtwin: two commands on a fresh machine.
#   make demo   set up .venv, simulate a small hospital, run the pipeline, summarise with DuckDB, draw one patient
#   make test   set up .venv, run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
MEDTWIN:= $(VENV)/bin/medtwin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo
# The patient shown by `make demo`: the first triage alert's, else the highest NEWS2.
DEMO_PATIENT := SELECT coalesce((SELECT subject_id FROM alerts WHERE kind = 'triage' ORDER BY onset_time LIMIT 1), \
                (SELECT patient_key FROM patient_twin ORDER BY news2_score DESC NULLS LAST LIMIT 1)) AS patient

.PHONY: install test demo bench clean-demo

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	rm -rf $(DEMO)
	$(MEDTWIN) simulate --out $(DEMO)/hospital --patients 20 --devices 4 --hours 3 --seed 7 --corrupt-fraction 0.01
	$(MEDTWIN) run --input $(DEMO)/hospital --output $(DEMO)/out --demo
	$(MEDTWIN) report $(DEMO)/out --images $(DEMO)/hospital/dicom --output $(DEMO)/patient.png \
	    --patient_key $$($(MEDTWIN) query $(DEMO)/out --csv "$(DEMO_PATIENT)" | tail -n 1)

bench: $(STAMP)
	$(PY) bench/telemetry.py --repeats 5
	$(PY) bench/device_alerts.py
	$(PY) bench/detector.py --weights model/weights
	$(PY) bench/imaging.py

clean-demo:
	rm -rf $(DEMO)
