-- The tables and indexes of an nft schema-version-2 SQLite database, as nft db28e56 created them.
CREATE TABLE nft_metadata (
	"key" VARCHAR(64) NOT NULL, 
	value TEXT NOT NULL, 
	PRIMARY KEY ("key")
);
CREATE TABLE campaigns (
	id INTEGER NOT NULL, 
	name VARCHAR(200) NOT NULL, 
	config JSON NOT NULL, 
	created_at DATETIME NOT NULL, 
	lease_id VARCHAR(64), 
	lease_owner VARCHAR(255), 
	lease_since DATETIME, 
	lease_heartbeat DATETIME, 
	PRIMARY KEY (id), 
	UNIQUE (name)
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
CREATE INDEX ix_structures_geometry_hash ON structures (geometry_hash);
CREATE INDEX ix_structures_kind ON structures (kind);
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
	claimed_by INTEGER, 
	PRIMARY KEY (id), 
	CONSTRAINT ck_job_status CHECK (status IN ('pending', 'running', 'done', 'failed')), 
	CONSTRAINT uq_job UNIQUE (structure_id, calculator, params_hash), 
	FOREIGN KEY(structure_id) REFERENCES structures (id), 
	FOREIGN KEY(claimed_by) REFERENCES campaigns (id)
);
CREATE INDEX ix_reference_jobs_status ON reference_jobs (status);
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
CREATE TABLE iterations (
	id INTEGER NOT NULL, 
	campaign_id INTEGER NOT NULL, 
	iteration INTEGER NOT NULL, 
	delta_per_target JSON NOT NULL, 
	max_delta FLOAT NOT NULL, 
	chunks_added INTEGER NOT NULL, 
	train_force_mae FLOAT, 
	wall_time JSON NOT NULL, 
	carved BOOLEAN NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_iteration UNIQUE (campaign_id, iteration), 
	FOREIGN KEY(campaign_id) REFERENCES campaigns (id)
);
CREATE TABLE campaign_structures (
	id INTEGER NOT NULL, 
	campaign_id INTEGER NOT NULL, 
	structure_id INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_campaign_structure UNIQUE (campaign_id, structure_id), 
	FOREIGN KEY(campaign_id) REFERENCES campaigns (id), 
	FOREIGN KEY(structure_id) REFERENCES structures (id)
);
CREATE INDEX ix_campaign_structures_structure_id ON campaign_structures (structure_id);
CREATE TABLE reference_results (
	job_id INTEGER NOT NULL, 
	energy FLOAT NOT NULL, 
	forces BLOB NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (job_id), 
	FOREIGN KEY(job_id) REFERENCES reference_jobs (id)
);
CREATE TABLE campaign_jobs (
	id INTEGER NOT NULL, 
	campaign_id INTEGER NOT NULL, 
	job_id INTEGER NOT NULL, 
	reused BOOLEAN NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_campaign_job UNIQUE (campaign_id, job_id), 
	FOREIGN KEY(campaign_id) REFERENCES campaigns (id), 
	FOREIGN KEY(job_id) REFERENCES reference_jobs (id)
);
CREATE INDEX ix_campaign_jobs_job_id ON campaign_jobs (job_id);
