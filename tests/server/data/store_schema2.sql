BEGIN TRANSACTION;
CREATE TABLE checkpoints (
	run_id VARCHAR(200) NOT NULL, 
	kind VARCHAR(40) NOT NULL, 
	round INTEGER NOT NULL, 
	metrics JSON NOT NULL, 
	saved FLOAT NOT NULL, 
	PRIMARY KEY (run_id, kind)
);
INSERT INTO "checkpoints" VALUES('old-run','best',1,'{"auc": 0.75}',1.79615487972696137421e+09);
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
INSERT INTO "events" VALUES(1,'old-run',1.79615487955363130573e+09,'info','run-started',NULL,'federated run started');
INSERT INTO "events" VALUES(2,'old-run',1.79615487959628152849e+09,'info','round-started',1,'round 1 started with 2 site(s)');
INSERT INTO "events" VALUES(3,'old-run',1.79615487963073277473e+09,'info','round-finished',1,'round 1 finished: 2 site(s) responded of 2 selected in 2.5 s');
INSERT INTO "events" VALUES(4,'old-run',1.79615487972696137421e+09,'info','checkpoint',1,'best checkpoint: round 1');
INSERT INTO "events" VALUES(5,'old-run',1.79615487975170183185e+09,'info','run-finished',NULL,'run finished');
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
INSERT INTO "rounds" VALUES('old-run',1,'finished',1.79615487959628152849e+09,1.79615487963073277473e+09,2.5,2,2,0,'{"auc": 0.75}','{"train-loss": 0.5}','{"auc": 0.7}','null');
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
	error TEXT, last_update FLOAT, 
	PRIMARY KEY (id)
);
INSERT INTO "runs" VALUES('old-run','federated','finished',1.79615487955363130573e+09,1.79615487975170183185e+09,'{"model": "simplecnn", "num-server-rounds": 1, "num-sites": 2}','{"medfed": "0.1.0"}',1,2,1,1,'{"rounds": 1}',NULL,1.79615487975170183185e+09);
CREATE TABLE schema_version (
	version INTEGER NOT NULL
);
INSERT INTO "schema_version" VALUES(2);
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
INSERT INTO "site_rounds" VALUES('old-run',1,'site-0',1.79615487963073277473e+09,'{"num_examples": 30.0, "dp-epsilon": 1.5}','{"auc": 0.7}',30.0,1.5,NULL,0);
INSERT INTO "site_rounds" VALUES('old-run',1,'site-1',1.79615487963073277473e+09,'{"num_examples": 31.0}','{"auc": 0.8}',31.0,NULL,NULL,0);
CREATE INDEX ix_events_run_id_id ON events (run_id, id);
COMMIT;
