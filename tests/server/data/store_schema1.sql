BEGIN TRANSACTION;
CREATE TABLE checkpoints (
	run_id VARCHAR(200) NOT NULL, 
	kind VARCHAR(40) NOT NULL, 
	round INTEGER NOT NULL, 
	metrics JSON NOT NULL, 
	saved FLOAT NOT NULL, 
	PRIMARY KEY (run_id, kind)
);
CREATE TABLE events (
	id INTEGER NOT NULL, 
	run_id VARCHAR(200) NOT NULL, 
	time FLOAT NOT NULL, 
	level VARCHAR(10) NOT NULL, 
	kind VARCHAR(40) NOT NULL, 
	round INTEGER, 
	message TEXT NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE rounds (
	run_id VARCHAR(200) NOT NULL, 
	round INTEGER NOT NULL, 
	status VARCHAR(20) NOT NULL, 
	started FLOAT NOT NULL, 
	finished FLOAT, 
	seconds FLOAT, 
	selected INTEGER, 
	responded INTEGER NOT NULL, 
	failures INTEGER NOT NULL, 
	global_metrics JSON NOT NULL, 
	fit_metrics JSON NOT NULL, 
	eval_metrics JSON NOT NULL, 
	secagg JSON, 
	PRIMARY KEY (run_id, round)
);
CREATE TABLE runs (
	id VARCHAR(200) NOT NULL, 
	mode VARCHAR(20) NOT NULL, 
	status VARCHAR(20) NOT NULL, 
	started FLOAT NOT NULL, 
	finished FLOAT, 
	config JSON NOT NULL, 
	versions JSON NOT NULL, 
	planned_rounds INTEGER NOT NULL, 
	num_sites INTEGER, 
	current_round INTEGER NOT NULL, 
	rounds_done INTEGER NOT NULL, 
	summary JSON, 
	error TEXT, 
	PRIMARY KEY (id)
);
INSERT INTO "runs" VALUES('old-run','federated','finished',100.0,160.0,'{"model": "simplecnn"}','{}',3,2,3,3,NULL,NULL);
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO "schema_version" VALUES(1);
CREATE TABLE site_rounds (
	run_id VARCHAR(200) NOT NULL, 
	round INTEGER NOT NULL, 
	site VARCHAR(100) NOT NULL, 
	recorded FLOAT NOT NULL, 
	fit JSON, 
	eval JSON, 
	num_examples FLOAT, 
	epsilon FLOAT, 
	budget_epsilon FLOAT, 
	declined BOOLEAN NOT NULL, 
	PRIMARY KEY (run_id, round, site)
);
COMMIT;
