-- nft campaign database, schema version 1 (pipeline/storage/schema.py at commit 8057728), as SQLite DDL:
-- the migration tests build a version-1 file from it.
CREATE TABLE campaigns (
	id INTEGER NOT NULL, 
	name VARCHAR(200) NOT NULL, 
	config JSON NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name)
);
CREATE TABLE nft_metadata (
	"key" VARCHAR(64) NOT NULL, 
	value TEXT NOT NULL, 
	PRIMARY KEY ("key")
);
CREATE TABLE structures (
	id INTEGER NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	identity VARCHAR(128) NOT NULL, 
	geometry_hash VARCHAR(64) NOT NULL, 
	n_atoms INTEGER NOT NULL, 
	numbers BLOB NOT NULL, 
	positions BLOB NOT NULL, 
	cell BLOB NOT NULL, 
	pbc BLOB NOT NULL, 
	parent_id INTEGER, 
	center_in_parent INTEGER, 
	center_in_chunk INTEGER, 
	radius FLOAT, 
	"vacuum" FLOAT, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT ck_structure_kind CHECK (kind IN ('target', 'initial', 'chunk')), 
	CONSTRAINT ck_chunk_fields CHECK ((kind = 'chunk') = (parent_id IS NOT NULL AND center_in_parent IS NOT NULL AND center_in_chunk IS NOT NULL AND radius IS NOT NULL)), 
	CONSTRAINT uq_chunk UNIQUE (parent_id, center_in_parent, radius), 
	UNIQUE (identity), 
	FOREIGN KEY(parent_id) REFERENCES structures (id)
);
CREATE INDEX ix_structures_kind ON structures (kind);
CREATE INDEX ix_structures_geometry_hash ON structures (geometry_hash);
CREATE TABLE iterations (
	id INTEGER NOT NULL, 
	campaign_id INTEGER NOT NULL, 
	iteration INTEGER NOT NULL, 
	delta_per_target JSON NOT NULL, 
	max_delta FLOAT NOT NULL, 
	chunks_added INTEGER NOT NULL, 
	train_force_mae FLOAT, 
	wall_time JSON NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_iteration UNIQUE (campaign_id, iteration), 
	FOREIGN KEY(campaign_id) REFERENCES campaigns (id)
);
CREATE TABLE models (
	id INTEGER NOT NULL, 
	campaign_id INTEGER NOT NULL, 
	iteration INTEGER NOT NULL, 
	path TEXT NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	metrics JSON NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_model_iteration UNIQUE (campaign_id, iteration), 
	FOREIGN KEY(campaign_id) REFERENCES campaigns (id)
);
CREATE TABLE reference_jobs (
	id INTEGER NOT NULL, 
	structure_id INTEGER NOT NULL, 
	calculator VARCHAR(64) NOT NULL, 
	params JSON NOT NULL, 
	params_hash VARCHAR(64) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	error TEXT, 
	host VARCHAR(255), 
	wall_time_s FLOAT, 
	external_id VARCHAR(128), 
	created_at DATETIME NOT NULL, 
	started_at DATETIME, 
	finished_at DATETIME, 
	PRIMARY KEY (id), 
	CONSTRAINT ck_job_status CHECK (status IN ('pending', 'running', 'done', 'failed')), 
	CONSTRAINT uq_job UNIQUE (structure_id, calculator, params_hash), 
	FOREIGN KEY(structure_id) REFERENCES structures (id)
);
CREATE INDEX ix_reference_jobs_status ON reference_jobs (status);
CREATE TABLE reference_results (
	job_id INTEGER NOT NULL, 
	energy FLOAT NOT NULL, 
	forces BLOB NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (job_id), 
	FOREIGN KEY(job_id) REFERENCES reference_jobs (id)
);
